from stages.compress.stage import main

raise SystemExit(main())
