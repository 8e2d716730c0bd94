"""``python -m etcd_rdzv``: the ``etcd-rdzv`` operator command (see ``etcd_rdzv.cli``)."""

import sys

from .cli import main

sys.exit(main())
