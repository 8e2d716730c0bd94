"""A lapse record of ``<run>/lapses/<host>/`` that is not a number (another client's, a hand edit)
counts as outside every window instead of failing the write that counts the lapses."""

import math

from etcd_rdzv.quarantine import _float


def test_a_lapse_record_that_is_no_number_counts_as_long_past():
    assert _float(b"1765150000.5") == 1765150000.5
    assert _float(b"not a time") == -math.inf
