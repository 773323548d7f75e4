"""`python -m helix_server` is `helix-server`."""

from helix_server.cli import main

raise SystemExit(main())
