from stages.train.stage import main

raise SystemExit(main())
