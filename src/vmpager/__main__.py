from vmpager.cli import main

raise SystemExit(main())
