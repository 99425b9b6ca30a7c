"""Shimmy's built-in plugins, installed as the package ``shimmy_plugins`` and
registered through the ``shimmy`` entry-point group like any third-party plugin."""
