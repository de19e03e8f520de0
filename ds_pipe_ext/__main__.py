from ds_pipe_ext.cli import main

raise SystemExit(main())
