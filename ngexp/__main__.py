from ngexp.cli import main

raise SystemExit(main())
