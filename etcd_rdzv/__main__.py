"""``python -m etcd_rdzv``: the ``etcd-rdzv`` operator command (see ``etcd_rdzv.cli``)."""

from .cli import main

raise SystemExit(main())
