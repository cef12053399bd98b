"""fusedrl.kernels._rows: the two-level row layout of a [..., D] tensor, checked against the
storage offset of every row computed by indexing."""

import pytest
import torch

from fusedrl.kernels._rows import RowLayout, row_layout, rows_are_disjoint

BASE = torch.zeros(4, 6, 5, 7)

LAYOUTS = {
    "contiguous": BASE,
    "slice_of_middle_axis": BASE[:, :, :-1],
    "shifted_slice": BASE[:, 1:, 1:],  # slices along two axes: three levels
    "transposed": BASE[0].transpose(0, 1),  # two levels, outer stride below inner
    "transposed_4d": BASE.transpose(0, 1),  # three levels
    "one_row": BASE[0, 0, :1],
    "size_one_dims": BASE[:, :1, 2:3],
    "strided_rows": BASE[:, ::2, 0],
    "expanded": torch.zeros(1, 7).expand(5, 7),
    "vector": torch.zeros(7),
    "empty": BASE[:, :0],
}


def row_offsets(t):
    """Storage offset of each flat row, read off an index tensor viewed with t's geometry."""
    index = torch.arange(t.untyped_storage().nbytes() // t.element_size())
    return index.as_strided(t.shape, t.stride(), t.storage_offset())[..., 0].reshape(-1).tolist()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_addresses_every_row(name):
    t = LAYOUTS[name]
    layout = row_layout(t)
    expected = row_offsets(t)
    if layout is None:
        assert name in ("shifted_slice", "transposed_4d")
        return
    assert layout.n_rows == len(expected)
    got = [
        (r // layout.inner) * layout.stride_outer + (r % layout.inner) * layout.stride_inner + t.storage_offset()
        for r in range(layout.n_rows)
    ]
    assert got == expected


def test_layout_values():
    assert row_layout(BASE) == RowLayout(n_rows=4 * 6 * 5, inner=4 * 6 * 5, stride_outer=0, stride_inner=7)
    assert row_layout(BASE[:, :, :-1]) == RowLayout(n_rows=4 * 6 * 4, inner=4, stride_outer=35, stride_inner=7)
    assert row_layout(BASE[:, 1:, 1:]) is None


def test_rows_are_disjoint():
    assert rows_are_disjoint(BASE[:, :, :-1])
    assert rows_are_disjoint(BASE[0].transpose(0, 1))
    assert not rows_are_disjoint(LAYOUTS["expanded"])
    assert not rows_are_disjoint(torch.zeros(10).as_strided((3, 4), (2, 1)))  # rows overlap by 2
    assert not rows_are_disjoint(BASE[:, 1:, 1:])  # no two-level layout: callers copy first
