"""``python -m genlab ...`` runs the genlab command line, as the ``genlab`` script does."""

from genlab.cli import main

raise SystemExit(main())
