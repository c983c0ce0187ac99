"""Every command-line error is one line on stderr that names the input, with exit code 2 (a table of
bad inputs run through ``vitlens.cli.main`` in-process); ``--debug`` shows the traceback instead;
``--param`` values are converted to the types the method declares."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from vitlens.cli import _parse_params, build_parser, main
from vitlens.errors import InputError, TargetError

from conftest import IMG, tiny_timm

MODEL = ["--model", "vit_tiny_patch16_224", "--weights", "random", "--device", "cpu"]
GPU_MSG = r"no CUDA GPU|only \d+ CUDA"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / "img.png")
    (d / "bad.jpg").write_bytes(b"not an image")
    (d / "folder").mkdir()
    (d / "empty_weights").mkdir()
    (d / "afile").write_text("x")
    (d / "out").mkdir()
    (d / "out" / "img_rollout.png").write_bytes(b"earlier run")
    return d


# (arguments, regex the one-line message must match: it names the input)
BAD = [
    # images
    (["explain", "/no/such/file.jpg", *MODEL], r"image file not found: /no/such/file\.jpg"),
    (["explain", "{d}/bad.jpg", *MODEL], r"cannot read image .*bad\.jpg"),
    (["explain", "{d}/folder", *MODEL], r"folder.* is a folder, not an image file"),
    (["explain", "{d}/img.png", "{d}/img.png", *MODEL], r"img\.png is given twice"),
    # methods and their parameters
    (["explain", "{d}/img.png", "--method", "nope", *MODEL], r"unknown method 'nope'"),
    (["explain", "{d}/img.png", "--method", "tiss", *MODEL], r"unknown method 'tiss'\. Did you mean 'tis'"),
    (["explain", "{d}/img.png", "--param", "n_mask=3", *MODEL], r"--param n_mask: unknown parameter .*'n_masks'"),
    (["explain", "{d}/img.png", "--param", "n_masks=abc", *MODEL], r"--param n_masks=abc: .* takes an integer"),
    (["explain", "{d}/img.png", "--param", "n_masks=3.5", *MODEL], r"--param n_masks=3\.5: .* takes an integer"),
    (["explain", "{d}/img.png", "--param", "ratio=half", *MODEL], r"--param ratio=half: .* takes a number"),
    (["explain", "{d}/img.png", "--param", "return_masks=maybe", *MODEL], r"return_masks=maybe: .*true or false"),
    (["explain", "{d}/img.png", "--method", "vitcx", "--param", "layers=top", *MODEL], r"--param layers=top: .*integer"),
    (["explain", "{d}/img.png", "--method", "rise", "--param", "masks=x", *MODEL], r"--param masks: .*Python API"),
    (["explain", "{d}/img.png", "--param", "noequals", *MODEL], r"--param expects KEY=VALUE, got 'noequals'"),
    (["explain", "{d}/img.png", "--param", "=3", *MODEL], r"--param expects KEY=VALUE, got '=3'"),
    # targets
    (["explain", "{d}/img.png", "--target", "3.5", *MODEL], r"--target 3\.5: a class index must be a whole number"),
    (["explain", "{d}/img.png", "--target", "", *MODEL], r"--target is empty"),
    (["explain", "{d}/img.png", "--target", "5000", *MODEL], r"target class 5000 is out of range"),
    (["explain", "{d}/img.png", "--target", "goldfsh", *MODEL], r"'goldfsh' is not a class name.*'goldfish'"),
    # devices (checked before loading)
    (["explain", "{d}/img.png", "--weights", "random", "--device", "cuda:99"], r"--device cuda:99: (" + GPU_MSG + ")"),
    (["explain", "{d}/img.png", "--weights", "random", "--device", "banana"], r"--device banana: .*not a torch device"),
    # models and weights
    (["explain", "{d}/img.png", "--model", "vit_tiny_patch16_22", "--weights", "random"],
     r"unknown timm model 'vit_tiny_patch16_22'\. Did you mean 'vit_tiny_patch16_224'"),
    (["explain", "{d}/img.png", "--model", "vit_tiny_patch16_22", "--weights", "{d}/empty_weights"],
     r"unknown timm model 'vit_tiny_patch16_22'"),
    (["explain", "{d}/img.png", "--model", "vit_tiny_patch16_22"], r"unknown timm model 'vit_tiny_patch16_22'"),
    (["explain", "{d}/img.png", "--model", "vit_tiny_patch16_224.nope", "--weights", "random"],
     r"unknown pretrained tag in model 'vit_tiny_patch16_224\.nope'"),
    (["explain", "{d}/img.png", "--model", "torchvision:vit_b_1", "--weights", "random"],
     r"unknown torchvision model 'vit_b_1'\. Did you mean 'vit_b_16'"),
    (["explain", "{d}/img.png", "--model", "nolib:foo", "--weights", "random"], r"unknown model library prefix 'nolib:'"),
    (["explain", "{d}/img.png", "--model", "vit_tiny_patch16_224", "--weights", "/no/such/w.safetensors"],
     r"weights path does not exist: /no/such/w\.safetensors"),
    (["explain", "{d}/img.png", "--model", "vit_tiny_patch16_224", "--weights", "{d}/empty_weights"],
     r"no weights file for 'vit_tiny_patch16_224' in .*empty_weights"),
    # outputs
    (["explain", "{d}/img.png", "--method", "rollout", "--out", "{d}/out", *MODEL],
     r"output .*img_rollout\.png already exists; pass --overwrite"),
    (["explain", "{d}/img.png", "--out", "{d}/afile", *MODEL], r"--out .*afile is a file"),
    # argparse usage errors, made one line
    (["explain", "{d}/img.png", "--seed", "abc", *MODEL], r"vitlens explain: argument --seed: invalid int value: 'abc'"),
    (["explain", "{d}/img.png", "--background", "grey", *MODEL], r"argument --background: invalid choice: 'grey'"),
    (["explain", "{d}/img.png", "--nope", *MODEL], r"unrecognized arguments: --nope"),
    (["explain"], r"the following arguments are required: images"),
    ([], r"the following arguments are required: "),
    (["frobnicate"], r"invalid choice: 'frobnicate'"),
    # other subcommands
    (["methods", "tiss"], r"unknown method 'tiss'\. Did you mean 'tis'"),
    (["demo", "--methods", "rollout,nope", *MODEL], r"unknown method 'nope'"),
    (["bench", "--methods", "tis", "--metrics", "insertion", "--method-param", "tis.n_masks=abc", "--out", "{d}/b",
      "--data", "{d}"], r"--method-param tis\.n_masks=abc: .* takes an integer"),
    (["bench", "--methods", "tis", "--metrics", "insertion", "--metric-param", "insertion.n_steps=many", "--out",
      "{d}/b", "--data", "{d}"], r"--metric-param insertion\.n_steps=many: .* takes an integer"),
    (["bench", "--methods", "tis", "--metrics", "insertoin", "--out", "{d}/b", "--data", "{d}"],
     r"unknown metric 'insertoin'\. Did you mean 'insertion'"),
    (["bench", "--methods", "tiss", "--metrics", "insertion", "--out", "{d}/b", "--data", "{d}"],
     r"unknown method 'tiss'\. Did you mean 'tis'"),
    (["bench", "--methods", "tis", "--metrics", "insertion", "--device", "cuda:99", "--out", "{d}/b", "--data", "{d}"],
     GPU_MSG),
    (["report", "{d}/folder"], r"folder"),
]


@pytest.mark.parametrize("args,pattern", BAD, ids=[f"{i:02d}" for i in range(len(BAD))])
def test_bad_input_gives_one_line_and_exit_code_2(args, pattern, files, capsys):
    argv = [a.replace("{d}", str(files)) for a in args]
    assert main(argv) == 2
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1, cap.err
    assert re.search(pattern, lines[0]), lines[0]
    assert lines[0].startswith("vitlens") and "Traceback" not in cap.err


def test_the_table_is_long_enough():
    assert len(BAD) >= 30


def test_debug_shows_the_traceback(files):
    with pytest.raises(InputError, match="image file not found"):  # re-raised: Python prints the traceback
        main(["explain", "/no/such/file.jpg", "--debug"])


def test_param_values_take_the_declared_type():
    assert _parse_params(["n_masks=8", "ratio=0.25", "return_masks=true", "score=logit"], "tis") == \
        dict(n_masks=8, ratio=0.25, return_masks=True, score="logit")
    with pytest.raises(InputError, match="'seed' is a run setting, not a parameter of method 'tis'.*--seed"):
        _parse_params(["seed=3"], "tis")
    got = _parse_params(["layers=1", "delta=none", "pcb=off", "sigma=1"], "vitcx")
    assert got == dict(layers=1, delta=None, pcb=False, sigma=1.0) and isinstance(got["sigma"], float)
    assert _parse_params(["layers=0,1"], "vitcx") == dict(layers=[0, 1])
    assert _parse_params(["layers=0.4"], "legrad") == dict(layers=0.4)
    assert _parse_params(["site=attn_branch"], "vitcx") == dict(site="attn_branch")
    assert _parse_params(["window=16,32", "stride=8"], "occlusion") == dict(window=(16, 32), stride=8)


def test_float_and_bool_targets_in_python_are_clear_errors():
    a = vitlens.wrap_model(tiny_timm("vit"))
    x = torch.randn(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    for bad, match in [(3.5, "float"), (True, "bool"), ([1, 2.0], "float"), (torch.tensor([1.5]), "dtype"),
                       ([], "empty")]:
        with pytest.raises(TargetError, match=match):
            vitlens.explain(a, x, method="rollout", target=bad)
    assert vitlens.explain(a, x, method="rollout", target=np.int64(3)).targets.tolist() == [3]


def test_version_help_texts_and_default_method(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vitlens {vitlens.__version__}"

    def walk(parser):
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for sub in action.choices.values():
                    yield from walk(sub)
            elif action.dest != "help":
                yield parser.prog, action

    missing = [f"{prog} {a.option_strings or a.dest}" for prog, a in walk(build_parser()) if not a.help]
    assert not missing
    assert main(["explain", "--help"]) == 0
    assert "default: tis" in " ".join(capsys.readouterr().out.split())


def test_methods_lists_parameters_and_shows_docstrings(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "n_masks: int = 1024" in out and "params:" in out
    assert main(["methods", "vitcx"]) == 0
    out = capsys.readouterr().out
    import inspect

    from vitlens.methods import get_method

    assert inspect.getdoc(get_method("vitcx").fn).splitlines()[0] in out and "delta: float | None = None" in out


def test_known_model_names_pass_the_check():
    from vitlens.models.loading import check_model_name

    for lib, name in [("timm", "vit_tiny_patch16_224"), ("timm", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
                      ("torchvision", "vit_b_16"), ("open_clip", "ViT-B-32"), ("hf", "google/vit-base-patch16-224"),
                      ("timm", "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k")]:
        check_model_name(lib, name)  # no error


def test_python_m_vitlens_bench_usage_errors_are_one_line(capsys):
    from vitlens.bench.cli import main as bench_main

    for argv, pattern in [(["--limit", "abc"], r"argument --limit: invalid int value: 'abc'"),
                          (["--frob"], r"unrecognized arguments: --frob")]:
        assert bench_main(argv) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and re.search(pattern, lines[0]), lines
