"""The ``vaemap`` command line: arguments, labels, the settings object, the group level."""
from __future__ import annotations

import tomllib

import pytest

from vaemap_bids import __version__
from vaemap_bids.cli.parser import UsageError, parse_args
from vaemap_bids.cli.run import build_config, main
from vaemap_bids.config import Config, VaemapError
from vaemap_bids.simulate.phantom import write_phantom_dataset


@pytest.fixture(scope="module")
def bids_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_phantom_dataset(root / "bids", root / "truth", shape=(8, 9, 7), subjects=("01", "02"))
    return root / "bids"


def test_defaults_and_every_flag(tmp_path, bids_dir):
    args = parse_args([str(bids_dir), str(tmp_path / "out"), "participant"])
    assert args.models is None and args.methods == ["lsq", "ssl", "vaeunig", "vaegmm"]
    assert args.device == "auto" and args.seed == 0 and not args.skip_bids_validation
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: Linear\nplugin_args: {status_callback: null}\n")
    hyper = tmp_path / "hp.yaml"
    hyper.write_text("vaegmm:\n  epochs: 3\nssl@msdki:\n  epochs: 2\n")
    deriv = tmp_path / "deriv"
    deriv.mkdir()
    args = parse_args([str(bids_dir), str(tmp_path / "out"), "participant",
                       "--participant-label", "sub-01", "02", "--session-label", "ses-a",
                       "--models", "msdki", "--methods", "lsq", "vaegmm", "-w", str(tmp_path / "w"),
                       "--device", "cpu", "--nprocs", "3", "--omp-nthreads", "2", "--mem-gb", "4.5",
                       "--seed", "11", "--config", str(hyper), "--derivatives", str(deriv),
                       "--use-plugin", str(plugin), "--skip-bids-validation", "-vv"])
    config = build_config(args)
    assert config.participant_label == ["01", "02"] and config.session_label == ["a"]
    assert config.models == ["msdki"] and config.models_explicit
    assert config.methods == ["lsq", "vaegmm"]
    assert config.work_dir == str((tmp_path / "w").resolve())
    assert (config.nprocs, config.omp_nthreads, config.mem_gb, config.seed) == (3, 2, 4.5, 11)
    assert config.hyperparameters == {"vaegmm": {"epochs": 3}, "ssl@msdki": {"epochs": 2}}
    assert config.derivatives == [str(deriv.resolve())]
    assert config.plugin == "Linear" and config.nipype_plugin_args() == {"status_callback": None}
    assert config.skip_bids_validation and config.verbosity == 2


def test_multiproc_plugin_args(tmp_path):
    config = Config(bids_dir="b", output_dir="o", nprocs=4, mem_gb=6, omp_nthreads=16)
    assert config.nipype_plugin_args() == {"n_procs": 4, "memory_gb": 6.0,
                                           "raise_insufficient": True}
    assert config.effective_omp_nthreads() == 4  # never more threads than processes
    config.plugin_args = {"n_procs": 2, "maxtasksperchild": 1}
    assert config.nipype_plugin_args()["n_procs"] == 2


def test_config_toml_roundtrip(tmp_path):
    config = Config(bids_dir="/b", output_dir="/o", work_dir=str(tmp_path), seed=5,
                    hyperparameters={"ssl": {"epochs": 2, "hidden_width": None}},
                    plugin_args={"n_procs": 2})
    path = config.write_toml(config.toml_path())
    assert path.parent == tmp_path and path.name.startswith("config-")
    data = tomllib.loads(path.read_text())["vaemap"]
    assert data["seed"] == 5 and data["hyperparameters"] == {"ssl": {"epochs": 2}}
    back = Config.from_toml(path)
    assert back == Config(**{**config.to_dict(), "hyperparameters": {"ssl": {"epochs": 2}}})


def test_rerun_from_the_settings_file(tmp_path, bids_dir):
    """``--config-file`` takes every setting of the run that wrote it; options given beside it
    override the file's."""
    first = build_config(parse_args([str(bids_dir), str(tmp_path / "out"), "participant",
                                     "-w", str(tmp_path / "w"), "--seed", "7", "--models",
                                     "msdki", "--methods", "lsq", "ssl", "--nprocs", "2"]))
    toml = first.write_toml(first.toml_path())
    again = build_config(parse_args(["--config-file", str(toml)]))
    for key in ("bids_dir", "output_dir", "analysis_level", "work_dir", "seed", "models",
                "models_explicit", "methods", "nprocs", "hyperparameters", "plugin"):
        assert getattr(again, key) == getattr(first, key), key
    assert again.run_uuid != first.run_uuid  # a new run, with its own settings file
    changed = build_config(parse_args(["--config-file", str(toml), "--seed", "0"]))
    assert changed.seed == 0 and changed.methods == ["lsq", "ssl"]
    with pytest.raises(VaemapError) as info:
        build_config(parse_args(["--config-file", str(tmp_path / "none.toml")]))
    assert info.value.exit_code == 66
    with pytest.raises(UsageError, match="required"):
        parse_args([str(bids_dir)])


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vaemap {__version__}"


def test_help_lists_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    for flag in ("--participant-label", "--session-label", "--models", "--methods", "--work-dir",
                 "--device", "--nprocs", "--omp-nthreads", "--mem-gb", "--seed", "--config",
                 "--derivatives", "--use-plugin", "--skip-bids-validation", "--version"):
        assert flag in out
    assert "75" in out and "16 BIDS validation failed" in out


def test_usage_errors_raise():
    with pytest.raises(UsageError):
        parse_args(["a", "b"])
    with pytest.raises(UsageError):
        parse_args(["a", "b", "participant", "--device", "tpu"])
    with pytest.raises(UsageError):
        parse_args(["a", "b", "participant", "--seed", "-1"])


def test_group_level_without_participant_outputs(capsys, tmp_path, bids_dir):
    code = main([str(bids_dir), str(tmp_path / "out"), "group"])
    err = capsys.readouterr().err
    assert code == 66
    assert "holds no participant outputs" in err
    assert not (tmp_path / "out").exists()


def test_group_level_lists_missing_subjects(capsys, tmp_path, bids_dir):
    (tmp_path / "out").mkdir()
    code = main([str(bids_dir), str(tmp_path / "out"), "group"])
    assert code == 66
    assert "missing or incomplete" in capsys.readouterr().err
    assert "sub-01" in (tmp_path / "out" / "group.html").read_text()


def test_work_dir_inside_bids_dir_refused(capsys, tmp_path, bids_dir):
    code = main([str(bids_dir), str(tmp_path / "out"), "participant", "-w",
                 str(bids_dir / "work")])
    assert code == 64 and "work dir must not be inside BIDS_DIR" in capsys.readouterr().err
    assert not (bids_dir / "work").exists()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_graph_flags_gpu_nodes(tmp_path, bids_dir, device):
    """Every fit node asks for a GPU slot on cuda (and none on cpu), so MultiProc's n_gpu_procs
    never runs two trainings on one GPU; built without running, so no GPU is needed."""
    from vaemap_bids.dataset.bids import collect_dwi_series, plan_series
    from vaemap_bids.workflows.base import init_vaemap_wf

    series = collect_dwi_series(bids_dir, ["01"])
    plans = [plan_series(s, ["msdki", "ballstick"], False, plan_dir=tmp_path) for s in series]
    config = Config(bids_dir=str(bids_dir), output_dir=str(tmp_path / "out"),
                    work_dir=str(tmp_path / "work"), resolved_device=device, nprocs=4,
                    omp_nthreads=2, methods=["lsq", "vaegmm"])
    wf = init_vaemap_wf(config, plans)
    fits = [n for n in wf._get_all_nodes() if n.name.startswith("fit_")]
    assert sorted(n.name for n in fits) == ["fit_ballstick_lsq", "fit_ballstick_vaegmm",
                                            "fit_msdki_lsq", "fit_msdki_vaegmm"]
    assert all(n.is_gpu_node() == (device == "cuda") for n in fits)
    assert all(n.n_procs == 2 and n.inputs.device == device and n.inputs.seed == 0 for n in fits)
    assert all(0 < n.mem_gb <= config.effective_mem_gb() for n in wf._get_all_nodes())
    args = config.nipype_plugin_args()
    assert ("n_gpu_procs" in args) == (device == "cuda")
    if device == "cuda":
        assert args["n_gpu_procs"] >= 1


def test_group_level_with_no_subject_exits_18(capsys, tmp_path):
    bids = tmp_path / "empty_bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "empty", "BIDSVersion": "1.9.0"}')
    (tmp_path / "out").mkdir()
    code = main([str(bids), str(tmp_path / "out"), "group"])
    assert code == 18
    assert "no participant to report on" in capsys.readouterr().err


def test_noise_model_flag_reaches_every_fit_and_round_trips(tmp_path, bids_dir, capsys):
    config = build_config(parse_args([str(bids_dir), str(tmp_path / "out"), "participant",
                                      "-w", str(tmp_path / "w"), "--noise-model", "gaussian"]))
    assert config.noise_model == "gaussian"
    for method in ("lsq", "ssl", "vaeunig", "vaegmm"):
        assert config.fit_options(method, "msdki")["noise_model"] == "gaussian"
    default = build_config(parse_args([str(bids_dir), str(tmp_path / "out"), "participant",
                                       "-w", str(tmp_path / "w2")]))
    assert default.fit_options("vaegmm", "ballstick")["noise_model"] == "rician"
    again = build_config(parse_args(["--config-file", str(config.write_toml(config.toml_path()))]))
    assert again.noise_model == "gaussian"
    assert main([str(bids_dir), str(tmp_path / "out"), "participant", "--noise-model",
                 "poisson"]) == 64
    assert "--noise-model" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("vaegmm:\n  noise_model: poisson\n")
    assert main([str(bids_dir), str(tmp_path / "out"), "participant", "--config", str(bad)]) == 64
    assert "poisson" in capsys.readouterr().err
