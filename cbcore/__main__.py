from cbcore.cli import main

raise SystemExit(main())
