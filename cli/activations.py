"""misbench extract / eval."""

import click

from .common import Progress, handle_errors, labels_option, refuses_overwrite, load_model_from_options, model_options, workers_option


@click.command()
@click.argument("model")
@model_options
@click.option("--data", required=True, help="ImageFolder directory, fashion-mnist:train|test, or digits.")
@click.option("--layers", required=True, help="Comma-separated module names, or logits, softmax, conv.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output HDF5 file.")
@click.option("--batch-size", default=64, show_default=True)
@workers_option
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--reduction", type=click.Choice(["mean", "max"]), default="mean", show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float32", show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N images.")
@click.option("--resize", type=int, default=None, help="Override the resize of the model's preprocessing.")
@click.option("--crop", type=int, default=None, help="Override the centre crop of the model's preprocessing.")
@click.option("--on-bad-image", type=click.Choice(["fail", "skip"]), default="fail", show_default=True)
@click.option("--amp", is_flag=True,
              help="Mixed precision: float16 on CUDA, bfloat16 on CPU (off by default: exact activations).")
@click.option("--keep", default=None, help="topk:K: store only the K highest and lowest activations per unit "
              "(exact MIS for K >= (explanations+1) x tasks; bounded memory on huge datasets).")
@click.option("--resume", is_flag=True, help="Continue an interrupted extraction.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file (kept until the new one is complete).")
@labels_option
@handle_errors
def extract(model, arch, num_classes, arch_kwargs, trust_pickle, data, layers, out, batch_size, workers, device,
            reduction, dtype, limit, resize, crop, on_bad_image, amp, keep, resume, overwrite, labels):
    """Record per-unit activations of MODEL on DATA into an HDF5 file."""
    from misbench.extract import ExtractSettings, extract as run_extract

    loaded = load_model_from_options(model, arch, num_classes, arch_kwargs, trust_pickle)
    settings = ExtractSettings(
        layers=tuple(s.strip() for s in layers.split(",") if s.strip()), reduction=reduction, dtype=dtype,
        limit=limit, on_bad_image=on_bad_image, resize=resize, crop=crop, amp=amp, keep=keep, labels=labels,
        batch_size=batch_size, workers=workers, device=device)
    from misbench.distributed import is_main

    with Progress("extract") as bar:
        path = run_extract(loaded, data, out, settings, resume=resume, overwrite=overwrite,
                           progress=bar if is_main() else None)
    if is_main():
        click.echo(f"wrote {path}")


@click.command("eval")
@click.argument("model", required=False)
@model_options
@click.option("--data", default=None, help="DATA to evaluate MODEL on.")
@click.option("--acts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Evaluate from a finished activation file's stored logits instead.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="eval.json")
@click.option("--classwise", type=click.Path(dir_okay=False), default=None, help="Also write class,name,n,accuracy CSV.")
@click.option("--batch-size", default=64, show_default=True)
@workers_option
@click.option("--device", default="auto", show_default=True)
@click.option("--limit", type=int, default=None)
@labels_option
@handle_errors
@refuses_overwrite("out", "classwise")
def evaluate(model, arch, num_classes, arch_kwargs, trust_pickle, data, acts, out, classwise, batch_size, workers,
             device, limit, labels):
    """Top-1, top-5 and class-wise accuracy of MODEL on DATA (or from --acts)."""
    from misbench.errors import MisbenchError
    from misbench.evaluate import evaluate_acts, evaluate_model, write_eval
    from misbench.fileio import refuse_same_paths

    refuse_same_paths({"--acts": acts, "MODEL": model}, {"--out": out, "--classwise": classwise})
    if acts:
        if model or data:
            raise MisbenchError("give either MODEL --data DATA or --acts FILE, not both")
        result = evaluate_acts(acts)
    else:
        if not model or not data:
            raise MisbenchError("eval needs MODEL and --data DATA (or --acts FILE)")
        loaded = load_model_from_options(model, arch, num_classes, arch_kwargs, trust_pickle)
        with Progress("eval") as bar:
            result = evaluate_model(loaded, data, batch_size, workers, device, limit, progress=bar, labels=labels)
    write_eval(result, out, classwise)
    click.echo(f"top1 {result['top1']:.4f}  top5 {result['top5']:.4f}  n {result['n_images']}  -> {out}")


COMMANDS = [extract, evaluate]
