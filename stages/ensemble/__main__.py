from stages.ensemble.stage import main

raise SystemExit(main())
