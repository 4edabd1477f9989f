from stages.ingest.stage import main

raise SystemExit(main())
