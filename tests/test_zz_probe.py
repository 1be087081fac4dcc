from test_cli_sample import model_dir, two_stage_cascade, cascade_dirs, sample  # noqa


def test_probe(model_dir, two_stage_cascade, cascade_dirs, tmp_path, capsys):  # noqa: F811
    for model, options in [
        (model_dir, ["--steps", "100"]),
        (model_dir, ["--size", "9"]),
        (cascade_dirs[0], ["--steps", "100"]),
        (cascade_dirs[0], ["--steps", "100,1"]),
        (cascade_dirs[0], ["--steps", "1,100"]),
        (two_stage_cascade, ["--steps", "1", "--strength", "1,0.5"]),
        (two_stage_cascade, ["--guidance-scale", "1,2"]),
        (two_stage_cascade, ["--guidance-scale", "2"]),
        (two_stage_cascade, ["--eta", "0.5", "--scheduler", "ddpm"]),
        (two_stage_cascade, ["--eta", "0.5,", "--scheduler", "ddpm"]),
        (two_stage_cascade, ["--mode", "fidelity", "--steps", "1,1,100"]),
        (two_stage_cascade, ["--mode", ",fidelity", "--steps", "1,1,100"]),
        (two_stage_cascade, ["--mode", ",fidelity", "--strength", ",0.5"]),
        (two_stage_cascade, ["--strength", ",0.001", "--steps", "1,1,3"]),
        (two_stage_cascade, ["--steps", "1,1,100", "--scheduler", "dpm"]),
        (two_stage_cascade, ["--steps", "60"]),
    ]:
        code = sample(model, tmp_path / "g.png", *options, "--overwrite")
        out = capsys.readouterr()
        import sys; sys.__stderr__.write(f"PROBE {options} {code} {out.err.strip().splitlines()[-1:]}\n")
