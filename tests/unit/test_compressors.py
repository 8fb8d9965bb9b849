"""Compressors and error-feedback state, one process (the multi-rank tests run them for real).

Each codec is checked against its own definition (fp8: the format's rounding bound;
onebit: sign times mean |x|; top-k: the k largest magnitudes), so that the
multi-rank tests, which compare the distributed result with the same codecs run in
one process, rest on codecs known to be right.
"""
import math

import pytest
import torch

from fmcomm import compression
from fmcomm.compression import ErrorFeedback, parse
from fmcomm.compression.base import round_up
from fmcomm.compression.fp8 import FMAX
from fmcomm.compression.topk import k_for
from fmcomm.errors import InvalidArgument


def payload(compressor, n):
    return torch.zeros(round_up(compressor.payload_bytes(n)), dtype=torch.uint8)[:compressor.payload_bytes(n)]


def roundtrip(spec, x, world=1, residual=None):
    """Contribution encode -> add into zeros -> (sum) encode -> decode, as one rank of ``world``."""
    c = parse(spec).compressor
    codec = c.begin(world, float(x.abs().max()) if x.numel() else 0.0)
    p = payload(c, x.numel())
    codec.encode_contribution(x.clone(), p, residual)
    acc = torch.zeros_like(x)
    codec.add_contribution(p, acc)
    return acc


# ------------------------------------------------------------------ parsing

@pytest.mark.parametrize("spec, text, level", [
    ("fp8", "fp8:e4m3", "all"), ("FP8@inter", "fp8:e4m3@inter", "inter"), ("fp8:e5m2", "fp8:e5m2", "all"),
    ("fp8:block=256", "fp8:e4m3,block=256", "all"), ("onebit@inter", "onebit@inter", "inter"),
    ("onebit:block=64@inter", "onebit:block=64@inter", "inter"),
    ("topk:0.01", "topk:0.01", "all"), ("bf16", "bf16", "all"), ("none", "none", "all"), (None, "none", "all"),
])
def test_parse_gives_canonical_names(spec, text, level):
    got = parse(spec)
    assert got.text == text and got.level == level
    assert got.enabled == (text != "none")


@pytest.mark.parametrize("spec, words", [
    ("zip", "unknown compressor"), ("topk", "one ratio"), ("topk:0", "(0, 1]"), ("topk:1.5", "(0, 1]"),
    ("topk:abc", "not a number"), ("fp8:e3m4", "unknown fp8 option"), ("fp8:block=0", "positive"),
    ("onebit:2", "unknown onebit option"), ("onebit:block=12", "multiple of 8"), ("fp8@intra", "unknown level"), ("none@inter", "no options"), (3, "string"),
])
def test_parse_rejects_bad_specs_saying_why(spec, words):
    with pytest.raises(InvalidArgument, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        parse(spec)


# ------------------------------------------------------------------- codecs

def test_fp16_divides_before_the_sum_and_saturates():
    x = torch.tensor([1.0, -3.0, 1e6, -1e6, 0.0])
    c = parse("fp16").compressor
    codec = c.begin(4, 0.0)
    p = payload(c, 5)
    codec.encode_contribution(x, p, None)
    sent = p.view(torch.float16).float()
    assert sent[:2].tolist() == [0.25, -0.75]           # x / world
    assert sent[2].item() == 65504.0 and sent[3].item() == -65504.0  # saturated, not inf
    out = torch.empty(5)
    codec.encode_sum(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), p, None)
    codec.decode_sum(p, out)
    assert out.tolist() == [4.0, 8.0, 12.0, 16.0, 20.0]  # the average times world: a sum again


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_error_within_the_format_bound(fmt):
    torch.manual_seed(0)
    x = torch.randn(100_000)
    got = roundtrip(f"fp8:{fmt}", x)
    # Round to nearest: |err| <= 2^-(mantissa bits + 1)·|x| above the subnormal range,
    # plus half the smallest subnormal spacing (at the scale) below it.
    u = 2.0 ** -4 if fmt == "e4m3" else 2.0 ** -3
    tiny = (2.0 ** -10 if fmt == "e4m3" else 2.0 ** -17) * float(x.abs().max()) / FMAX[fmt]
    assert bool(((got - x).abs() <= u * x.abs() + tiny).all())
    assert float(got.abs().max()) == pytest.approx(float(x.abs().max()), rel=u)  # the max maps to fp8's max


def test_fp8_per_block_scales_follow_each_block():
    x = torch.cat([torch.full((64,), 1e-3), torch.full((64,), 1e3)])
    got = roundtrip("fp8:block=64", x)
    assert torch.allclose(got, x, rtol=2.0 ** -4)  # one shared scale would flush the small block to zero


@pytest.mark.parametrize("spec", ["fp8", "fp8:block=16", "onebit", "onebit:block=16", "topk:0.1", "fp16", "bf16"])
def test_a_zero_bucket_gives_zeros(spec):
    x = torch.zeros(100)
    r = torch.zeros(100) if parse(spec).compressor.error_feedback else None
    got = roundtrip(spec, x, residual=r)
    assert torch.equal(got, torch.zeros(100))


def test_onebit_is_sign_times_mean_magnitude_with_exact_feedback():
    torch.manual_seed(1)
    x = torch.randn(1001)
    r = torch.zeros(1001)
    got = roundtrip("onebit", x, residual=r)
    scale = float(x.abs().double().mean())
    expect = torch.where(x < 0, -scale, scale)
    assert torch.allclose(got, expect, rtol=1e-6, atol=0)
    # What was not sent stays behind: decoded + residual == input (float32 rounding of one subtraction).
    assert torch.allclose(got + r, x, rtol=0, atol=2.0 ** -22 * (scale + float(x.abs().max())))


def test_onebit_blocks_keep_each_blocks_magnitude_with_exact_feedback():
    torch.manual_seed(2)
    x = torch.cat([torch.randn(64) * 1e-3, torch.randn(64) * 1e3, torch.randn(37)])  # a short last block
    r = torch.zeros(x.numel())
    got = roundtrip("onebit:block=64", x, residual=r)
    for lo, hi in ((0, 64), (64, 128), (128, x.numel())):
        scale = float(x[lo:hi].abs().double().mean())
        assert torch.allclose(got[lo:hi], torch.where(x[lo:hi] < 0, -scale, scale), rtol=1e-6, atol=0)
    assert torch.allclose(got + r, x, rtol=0, atol=2.0 ** -22 * 2 * float(x.abs().max()))


def test_topk_keeps_the_largest_and_remembers_the_rest():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 4.0, 0.0, -2.0])
    r = torch.zeros(8)
    got = roundtrip("topk:0.375", x, residual=r)  # k = 3 of 8
    assert got.tolist() == [0.0, -5.0, 0.0, 3.0, 0.0, 4.0, 0.0, 0.0]
    assert torch.equal(got + r, x)  # every value is either sent or kept, exactly


@pytest.mark.parametrize("ratio, n, k", [(0.01, 300, 3), (0.01, 1, 1), (0.5, 7, 4), (1.0, 5, 5), (0.01, 0, 0)])
def test_k_for(ratio, n, k):
    assert k_for(ratio, n) == k


@pytest.mark.parametrize("spec", ["fp16", "bf16", "fp8", "fp8:block=8", "onebit", "onebit:block=8", "topk:0.25"])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_payload_sizes_are_what_the_codec_writes(spec, n):
    c = parse(spec).compressor
    x = torch.randn(n)
    codec = c.begin(3, float(x.abs().max()) if n else 0.0)
    big = torch.full((c.payload_bytes(n) + 16,), 0xAB, dtype=torch.uint8)
    codec.encode_contribution(x, big[:c.payload_bytes(n)], torch.zeros(n) if c.error_feedback else None)
    assert torch.equal(big[c.payload_bytes(n):], torch.full((16,), 0xAB, dtype=torch.uint8))  # nothing beyond


@pytest.mark.parametrize("spec, u", [("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8), ("fp8", 2.0 ** -4),
                                     ("fp8:block=8", 2.0 ** -4), ("onebit", None), ("onebit:block=8", None),
                                     ("topk:0.25", None)])
def test_owner_adds_its_own_values_uncoded_in_the_contributions_scale(spec, u):
    """The owner's own share goes into the sum as a decoded contribution would, less the rounding."""
    c = parse(spec).compressor
    world, x = 3, torch.randn(1000)
    codec = c.begin(world, float(x.abs().max()))
    own = torch.zeros(1000)
    residual = torch.randn(1000) if c.error_feedback else None
    held = residual.clone() if residual is not None else None
    codec.add_own(x, own, residual)
    if u is None:
        # Error-feedback families add values as they are, and a residual still held once.
        assert torch.equal(own, x + held) and not residual.any()
        return
    coded = torch.zeros(1000)
    p = payload(c, 1000)
    codec.encode_contribution(x.clone(), p, None)
    codec.add_contribution(p, coded)
    # Coding rounds each value once (relative u); fp8's subnormals below 2^-6 of its
    # scale round to 2^-10 of it absolutely. Casts divide by the world first, so a
    # wrong scale would be off by 3x, far beyond this.
    assert ((coded - own).abs() <= u * own.abs() + 2.0 ** -10 * float(x.abs().max()) / 448 * 2).all()


@pytest.mark.parametrize("spec", ["fp16", "bf16", "fp8", "fp8:e5m2", "fp8:block=8", "onebit", "onebit:block=8",
                                  "topk:0.25"])
@pytest.mark.parametrize("world, divisor", [(3, 3), (4, 4), (2, 6), (5, 1)])
def test_decode_sum_divides_to_the_bits_a_second_pass_gives(spec, world, divisor):
    """An average's division folded into the decode changes no bit of the result.

    ``divisor`` differs from the codec's world where a lane's codec decodes the average
    over every node's ranks (``@inter``). Exact equality: the folded forms are one
    float32 division of each value, as the pass they replace.
    """
    c = parse(spec).compressor
    torch.manual_seed(world * 10 + divisor)
    acc = torch.randn(1003) * 3
    acc[::17] = 0.0
    acc[5] = -0.0
    codec = c.begin(world, float(acc.abs().max()))
    p = payload(c, acc.numel())
    codec.encode_sum(acc, p, torch.zeros_like(acc) if c.error_feedback else None)
    two_passes, folded = torch.empty_like(acc), torch.full_like(acc, math.nan)
    codec.decode_sum(p, two_passes)
    two_passes.div_(divisor)
    codec.decode_sum(p, folded, divisor)
    assert torch.equal(folded.view(torch.int32), two_passes.view(torch.int32))  # bits, signed zeros too


# ----------------------------------------------------------- error feedback

def test_error_feedback_slots_save_restore_reset():
    ef = ErrorFeedback()
    s = ef.slot("bucket0", "all", 10, 4, "cpu")
    s.worker += 1.5
    s.server -= 2.0
    assert ef.slot("bucket0", "all", 10, 4, "cpu") is s
    saved = ef.state_dict()
    assert set(saved) == {"bucket0/all/worker", "bucket0/all/server"}
    other = ErrorFeedback()
    other.load_state_dict(saved)
    assert torch.equal(other.slot("bucket0", "all", 10, 4, "cpu").worker, torch.full((10,), 1.5))
    s.worker.zero_()  # the saved copy is a copy
    assert torch.equal(saved["bucket0/all/worker"], torch.full((10,), 1.5))
    other.reset("bucket0")
    assert len(other) == 0
    ef.reset()
    assert ef.keys() == []


def test_error_feedback_refuses_a_key_reused_for_another_size():
    ef = ErrorFeedback()
    ef.slot(3, "all", 10, 4, "cpu")
    with pytest.raises(InvalidArgument, match="one key per tensor"):
        ef.slot(3, "all", 11, 4, "cpu")


@pytest.mark.parametrize("bad, words", [
    ({"x/all": torch.zeros(2)}, "KEY/LEVEL"), ({"x/all/worker": torch.zeros(2)}, "lacks its server"),
    ({"x/all/worker": torch.zeros(2, dtype=torch.float64), "x/all/server": torch.zeros(1)}, "float32"),
])
def test_error_feedback_load_checks_what_it_is_given(bad, words):
    with pytest.raises(InvalidArgument, match=words):
        ErrorFeedback().load_state_dict(bad)


@pytest.mark.parametrize("key", [1.5, None, True, "a/b"])
def test_error_feedback_keys_are_str_or_int(key):
    with pytest.raises(InvalidArgument):
        ErrorFeedback().slot(key, "all", 1, 1, "cpu")


def test_families_are_listed():
    assert set(compression.FAMILIES) == {"none", "fp16", "bf16", "fp8", "onebit", "topk"}
    assert math.isclose(FMAX["e4m3"], 448.0)
