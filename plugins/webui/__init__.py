"""The chat page at ``/`` (docs/webui.md): a page and its static files, served by the server it talks to."""
