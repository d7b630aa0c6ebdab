from mocov3.cli import main

raise SystemExit(main())
