from stages.evaluate.stage import main

raise SystemExit(main())
