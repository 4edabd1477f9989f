from stages.register.stage import main

raise SystemExit(main())
