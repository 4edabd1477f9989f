from stages.validate.stage import main

raise SystemExit(main())
