"""The exception tree, and argument checking on a real single-rank communicator (MPI singleton)."""
import inspect
import os

import numpy as np
import re

import pytest
import torch

import fmcomm
from fmcomm import compression, errors
from fmcomm.errors import InvalidArgument
from fmcomm.dtypes import DTYPES

OPS = ("sum", "avg", "min", "max", "prod")


# ------------------------------------------------------------ exception tree

def error_classes():
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, BaseException) and c.__module__ == errors.__name__]


def test_the_package_exports_every_error_class():
    exported = {getattr(fmcomm, n) for n in fmcomm.__all__}
    assert set(error_classes()) <= exported
    assert len(error_classes()) == 14


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_every_error_is_an_fmcomm_error(cls):
    assert issubclass(cls, fmcomm.FmcommError)


@pytest.mark.parametrize("cls, also", [
    (fmcomm.CommTimeoutError, TimeoutError), (fmcomm.CommTimeoutError, fmcomm.CollectiveError),
    (fmcomm.MismatchError, fmcomm.CollectiveError), (fmcomm.TransportError, fmcomm.CollectiveError),
    (fmcomm.ConfigError, ValueError), (fmcomm.InvalidArgument, ValueError), (fmcomm.FmcommError, RuntimeError),
])
def test_error_also_derives_from(cls, also):
    assert issubclass(cls, also)


def test_comm_timeout_error_is_caught_as_timeout_error():
    with pytest.raises(TimeoutError):
        raise fmcomm.CommTimeoutError("recv did not complete", rank=1, op="all_reduce", seq=4, peer=0)


@pytest.mark.parametrize("cls", [fmcomm.CollectiveError, fmcomm.CommTimeoutError,
                                 fmcomm.MismatchError, fmcomm.TransportError])
def test_collective_error_message_names_rank_op_seq_and_peer(cls):
    e = cls("receive failed", rank=3, op="all_reduce", seq=17, peer=2)
    assert str(e) == "[rank 3, op all_reduce, seq 17, peer 2] receive failed"
    assert (e.rank, e.op, e.seq, e.peer) == (3, "all_reduce", 17, 2)


def test_collective_error_keeps_zero_and_leaves_out_what_is_unknown():
    assert str(fmcomm.CollectiveError("x", rank=0, seq=0)) == "[rank 0, seq 0] x"
    assert str(fmcomm.CollectiveError("x", peer=0)) == "[peer 0] x"
    e = fmcomm.CollectiveError("plain")
    assert str(e) == "plain" and (e.rank, e.op, e.seq, e.peer) == (None, None, None, None)


# ------------------------------------------- a real single-rank communicator

@pytest.fixture(scope="module")
def comm():
    # init() reads FMCOMM_* from os.environ and rejects names it does not know, so the
    # settings of the calling environment (CI sets FMCOMM_NATIVE=on) must not change what these tests mean.
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("FMCOMM_")]:
            mp.delenv(key)
        c = fmcomm.init(transport="mpi")
    yield c
    fmcomm.finalize()


def test_single_rank_communicator(comm):
    assert (comm.rank, comm.world, comm.transport.name) == (0, 1, "mpi")
    assert fmcomm.default_communicator() is comm
    assert (fmcomm.get_rank(), fmcomm.get_world_size()) == (0, 1)


@pytest.mark.parametrize("make", [
    lambda: torch.ones(4, 4).t(),
    lambda: torch.ones(8)[::2],
    lambda: torch.ones(2, 3, 4).permute(2, 0, 1),
], ids=["transposed", "strided", "permuted"])
def test_non_contiguous_tensor(comm, make):
    with pytest.raises(fmcomm.InvalidArgument, match="contiguous"):
        fmcomm.all_reduce(make())


@pytest.mark.parametrize("dtype", [torch.complex64, torch.uint8, torch.bool, torch.int16, torch.float8_e4m3fn])
def test_unsupported_torch_dtype(comm, dtype):
    with pytest.raises(fmcomm.InvalidArgument, match="unsupported dtype"):
        fmcomm.all_reduce(torch.zeros(4, dtype=dtype))


@pytest.mark.parametrize("dtype", [np.complex64, np.uint8, np.bool_, np.uint32])
def test_unsupported_numpy_dtype(comm, dtype):
    with pytest.raises(fmcomm.InvalidArgument, match="unsupported dtype"):
        fmcomm.all_reduce(np.zeros(4, dtype=dtype))


@pytest.mark.parametrize("op", ["mean", "", "band", None, 0])
def test_unknown_op(comm, op):
    with pytest.raises(fmcomm.InvalidArgument, match="unsupported reduction op"):
        fmcomm.all_reduce(torch.ones(4), op=op)


@pytest.mark.parametrize("algo", ["butterfly", "Ring2", "nccl"])
def test_unknown_algo(comm, algo):
    with pytest.raises(fmcomm.InvalidArgument, match="unknown algorithm"):
        fmcomm.all_reduce(torch.ones(4), algo=algo)


@pytest.mark.parametrize("output", [torch.zeros(5), torch.zeros(3), torch.zeros(4, dtype=torch.float64),
                                    torch.zeros(4, dtype=torch.int32), np.zeros(4, dtype=np.float64)],
                         ids=["longer", "shorter", "float64", "int32", "numpy-float64"])
def test_output_must_match_the_input(comm, output):
    t = torch.arange(4, dtype=torch.float32)
    with pytest.raises(fmcomm.InvalidArgument, match="output must match the input"):
        fmcomm.all_reduce(t, output=output)
    assert t.tolist() == [0, 1, 2, 3]


def test_non_contiguous_output(comm):
    with pytest.raises(fmcomm.InvalidArgument, match="output: tensor must be contiguous"):
        fmcomm.all_reduce(torch.ones(4), output=torch.zeros(8)[::2])


@pytest.mark.parametrize("obj", [[1.0, 2.0], 3.0, "tensor"])
def test_not_a_tensor(comm, obj):
    with pytest.raises(fmcomm.InvalidArgument, match="expected a torch.Tensor or numpy.ndarray"):
        fmcomm.all_reduce(obj)


def test_numpy_non_contiguous(comm):
    with pytest.raises(fmcomm.InvalidArgument, match="C-contiguous"):
        fmcomm.all_reduce(np.ones((4, 4), dtype=np.float32).T)
    with pytest.raises(fmcomm.InvalidArgument, match="C-contiguous"):
        fmcomm.all_reduce(np.ones(8, dtype=np.float32)[::2])


def test_numpy_read_only(comm):
    a = np.ones(4, dtype=np.float32)
    a.flags.writeable = False
    with pytest.raises(fmcomm.InvalidArgument, match="read-only"):
        fmcomm.all_reduce(a)


@pytest.mark.parametrize("algo", ["auto", "ring", "native"])
@pytest.mark.parametrize("op", OPS)
def test_numpy_float32_world_one_leaves_values_unchanged(comm, op, algo):
    a = np.linspace(-3, 5, 12, dtype=np.float32).reshape(3, 4)
    before = a.copy()
    assert fmcomm.all_reduce(a, op=op, algo=algo) is None
    assert a.tobytes() == before.tobytes()


@pytest.mark.parametrize("algo", ["auto", "ring"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_torch_world_one_leaves_values_unchanged(comm, dtype_name, op, algo):
    dtype = DTYPES[dtype_name].torch
    t = torch.tensor([-7, -1, 0, 1, 3, 100], dtype=dtype)
    before = t.clone()
    fmcomm.all_reduce(t, op=op.upper(), algo=algo)
    assert torch.equal(t, before)


@pytest.mark.parametrize("algo", ["auto", "ring", "native"])
def test_out_of_place_copies_into_output_and_leaves_input(comm, algo):
    t = torch.arange(6, dtype=torch.float64)
    out = torch.full((6,), -1.0, dtype=torch.float64)
    fmcomm.all_reduce(t, output=out, algo=algo)
    assert out.tolist() == [0, 1, 2, 3, 4, 5] and t.tolist() == [0, 1, 2, 3, 4, 5]


def test_native_bfloat16_over_mpi_is_unsupported(comm):
    from mpi4py import MPI
    if getattr(MPI, "BFLOAT16_T", MPI.DATATYPE_NULL) != MPI.DATATYPE_NULL:
        pytest.skip("this MPI library has a bfloat16 datatype")
    t = torch.ones(4, dtype=torch.bfloat16)
    with pytest.raises(fmcomm.UnsupportedError, match="no native all_reduce for bfloat16"):
        fmcomm.all_reduce(t, algo="native")
    fmcomm.all_reduce(t, algo="auto")  # auto picks ring for it instead
    assert t.tolist() == [1, 1, 1, 1]


def test_async_op_returns_a_completed_handle(comm):
    t = torch.arange(1000, dtype=torch.int64)
    work = fmcomm.all_reduce(t, async_op=True)
    assert isinstance(work, fmcomm.Work)
    assert work.wait() is True
    assert work.is_completed() is True
    assert work.exception() is None
    assert torch.equal(t, torch.arange(1000, dtype=torch.int64))


def test_async_calls_finish_before_a_later_sync_call(comm):
    tensors = [torch.full((64,), float(i)) for i in range(5)]
    works = [fmcomm.all_reduce(t, op="max", algo="ring", async_op=True) for t in tensors]
    fmcomm.all_reduce(torch.zeros(3))  # drains the pending async work first
    assert all(w.is_completed() for w in works)
    assert [t[0].item() for t in tensors] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("algo", ["auto", "ring", "native"])
@pytest.mark.parametrize("n", [0, 1])
def test_sizes_zero_and_one(comm, n, algo):
    t = torch.full((n,), 2.5)
    fmcomm.all_reduce(t, op="avg", algo=algo)
    assert t.tolist() == [2.5] * n
    a = np.full(n, 4, dtype=np.int32)
    fmcomm.all_reduce(a, algo=algo)
    assert a.tolist() == [4] * n


def test_an_argument_error_leaves_the_communicator_usable(comm):
    with pytest.raises(fmcomm.InvalidArgument):
        fmcomm.all_reduce(torch.ones(4), op="mean")
    t = torch.ones(4)
    fmcomm.all_reduce(t)
    assert t.tolist() == [1, 1, 1, 1]


def test_all_to_all_refuses_overlapping_buffers(comm):
    x = torch.zeros(4)
    with pytest.raises(fmcomm.InvalidArgument, match="share memory"):
        fmcomm.all_to_all_single(x, x)


@pytest.mark.parametrize("kwargs, words", [
    ({"compress": "fp8", "op": "max"}, "sum or avg"),
    ({"compress": "fp8", "algo": "ring"}, "not both"),
    ({"compress": "zip"}, "unknown compressor"),
    ({"compress": "topk:2"}, "ratio"),
    ({"compress": "onebit", "state": {}}, "ErrorFeedback"),
    ({"compress": "onebit", "key": 1.5}, "str or int"),
])
def test_compressed_all_reduce_argument_errors(comm, kwargs, words):
    with pytest.raises(InvalidArgument, match=words):
        comm.all_reduce(torch.ones(8), **kwargs)


def test_compressed_all_reduce_needs_a_float_tensor(comm):
    with pytest.raises(InvalidArgument, match="float32, float16 or bfloat16"):
        comm.all_reduce(torch.ones(8, dtype=torch.int32), compress="fp8")


@pytest.mark.parametrize("spec", ["fp16", "fp8", "onebit", "topk:0.5", "fp8@inter"])
def test_compressed_all_reduce_on_one_rank_is_decode_of_encode(comm, spec):
    x = torch.linspace(-1, 1, 101)
    t = x.clone()
    comm.all_reduce(t, compress=spec, key=f"unit-{spec}")
    assert torch.isfinite(t).all() and not torch.equal(t, torch.zeros(101))
    # Feedback families keep what they did not send: the next call with zeros sends it.
    if compression.parse(spec).compressor.error_feedback:
        rest = torch.zeros(101)
        comm.all_reduce(rest, compress=spec, key=f"unit-{spec}")
        assert float((t + rest - x).abs().max()) < float((t - x).abs().max())


def test_compressed_all_reduce_without_a_key_keeps_no_residuals(comm):
    # Keyed by size, residuals grew with every new size and mixed tensors of one size.
    gen = torch.Generator().manual_seed(3)
    before = comm.error_feedback.keys()  # other tests' keyed calls share this communicator
    for _ in range(40):
        n = int(torch.randint(1, 5000, (1,), generator=gen))
        comm.all_reduce(torch.randn(n, generator=gen), compress="onebit")
        comm.all_reduce(torch.randn(n, generator=gen), compress="topk:0.1")
    assert comm.error_feedback.keys() == before


def test_one_key_under_two_compressors_keeps_two_sets_of_residuals(comm):
    state = compression.ErrorFeedback()
    x = torch.linspace(-1, 1, 64)
    a, b = x.clone(), x.clone()
    comm.all_reduce(a, compress="onebit", state=state, key="grad")
    onebit_residual = state.state_dict()["grad/onebit@all/worker"].clone()
    comm.all_reduce(b, compress="topk:0.25", state=state, key="grad")
    saved = state.state_dict()
    assert set(saved) == {f"grad/{c}@all/{role}" for c in ("onebit", "topk:0.25") for role in ("worker", "server")}
    assert torch.equal(saved["grad/onebit@all/worker"], onebit_residual)  # top-k did not touch it


@pytest.mark.parametrize("kwargs,problem", [
    ({"compress": "auto"}, "compress='auto' needs max_error"),
    ({"compress": "auto", "max_error": 0}, "compress='auto' needs max_error"),
    ({"compress": "auto", "max_error": True}, "compress='auto' needs max_error"),
    ({"compress": "fp8", "max_error": 0.1}, "max_error applies to compress='auto' only"),
    ({"max_error": 0.1}, "max_error applies to compress='auto' only"),
])
def test_compress_auto_needs_a_budget(comm, kwargs, problem):
    with pytest.raises(fmcomm.InvalidArgument, match=re.escape(problem)):
        comm.all_reduce(torch.ones(4), **kwargs)


def test_compress_auto_within_budget_on_one_rank_runs_uncompressed(comm):
    t = torch.arange(4.0)
    comm.all_reduce(t, compress="auto", max_error=0.05)  # no table, no figures: none
    assert torch.equal(t, torch.arange(4.0)) and comm.compression_for(16, 0.05).spec == "none"
