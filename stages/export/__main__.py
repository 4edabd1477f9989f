from stages.export.stage import main

raise SystemExit(main())
