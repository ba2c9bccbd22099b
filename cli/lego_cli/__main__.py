from lego_cli.main import main

raise SystemExit(main())
