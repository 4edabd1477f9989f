from stages.features.stage import main

raise SystemExit(main())
