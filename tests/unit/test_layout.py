"""ParallelLayout: parsing, printing, rank <-> coordinates, validation, records."""

import pytest
from elastickit.checkpoint.format.manifest import LayoutRecord
from elastickit.reshard.layout import ParallelLayout, axis_coords, axis_sizes

pytestmark = pytest.mark.timeout(30)


def test_parse_and_print_round_trip():
    lay = ParallelLayout.parse("tp=2,pp=2,dp=2")
    assert (lay.tp, lay.pp, lay.dp, lay.world_size) == (2, 2, 2, 8)
    assert str(lay) == "pp=2,dp=2,tp=2"
    assert ParallelLayout.parse(str(lay)) == lay
    assert str(ParallelLayout.parse("dp=4,zero=1")) == "dp=4,zero=1"
    assert str(ParallelLayout()) == "dp=1"


def test_rank_coordinates_row_major_tp_innermost():
    lay = ParallelLayout.parse("pp=2,dp=2,tp=2")
    assert lay.coords(5) == {"pp": 1, "dp": 0, "ep": 0, "cp": 0, "tp": 1}
    for r in range(8):
        assert lay.rank_of(**lay.coords(r)) == r
    assert lay.group(5, "tp") == [4, 5]
    assert lay.group(5, "dp") == [5, 7]


def test_declared_order():
    lay = ParallelLayout.parse("dp=2,tp=2,order=tp.dp")
    assert lay.coords(1) == {"pp": 0, "ep": 0, "cp": 0, "tp": 0, "dp": 1}
    assert ParallelLayout.from_record(lay.to_record()) == lay


@pytest.mark.parametrize(
    "text, message",
    [
        ("tp=0", "layout axis 'tp' must be at least 1, got 0 in 'tp=0'"),
        ("xp=2", "unknown layout axis 'xp'"),
        ("tp=two", "layout axis 'tp' needs an integer"),
        ("tp", "must look like axis=N"),
        ("zero=4", "zero must be 0, 1, 2 or 3, got 4 in 'zero=4'"),
        ("", "names no axis"),
        ("tp=2,tp=2", "given twice"),
        ("order=tp.qq", "layout order"),
    ],
)
def test_validation_names_the_field(text, message):
    with pytest.raises(ValueError, match=message):
        ParallelLayout.parse(text)


def test_coords_out_of_range():
    with pytest.raises(ValueError, match="rank 4 is outside"):
        ParallelLayout(dp=2).coords(4)


def test_record_round_trip_and_helpers():
    lay = ParallelLayout(pp=2, dp=3, tp=2, zero=2)
    rec = lay.to_record()
    assert rec.world_size == 12 and rec.zero == 2
    assert ParallelLayout.from_record(LayoutRecord.from_json(rec.to_json())) == lay
    assert ParallelLayout.from_record(LayoutRecord(axes=(("world", 4),))).dp == 4
    assert axis_sizes(rec)["tp"] == 2
    for r in range(12):
        assert axis_coords(rec, r) == lay.coords(r)
    # a trainer mesh record (pp, dp, tp) numbers ranks the same way
    mesh = LayoutRecord(axes=(("pp", 2), ("dp", 3), ("tp", 2)))
    assert axis_coords(mesh, 7) == lay.coords(7)
