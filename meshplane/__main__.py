from meshplane.cli import main

raise SystemExit(main())
