from shimmy_core.cli import main

raise SystemExit(main())
