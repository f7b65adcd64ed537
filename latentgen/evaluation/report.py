"""latentgen-eval's results as a markdown table a person reads (eval.json keeps everything)."""

from __future__ import annotations

from typing import Any


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def _per_group(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {100 * value:.0f}" for name, value in values.items())


def markdown_table(results: dict[str, Any]) -> str:
    """A `| metric | value |` table of `evaluate_checkpoint`'s results, headed by what was evaluated."""
    dataset = results["dataset"]
    lines = [f"checkpoint: {results['checkpoint']}",
             f"dataset: {dataset.get('name')} {dataset.get('image_size', '?')}px (per {results['dataset_source']}); "
             f"conditioning: {', '.join(results['conditioning']) or 'none'}"]
    sampling = results.get("sampling")
    if sampling:
        lines.append(f"samples: {sampling['num_samples']}, {sampling['scheduler']} {sampling['steps']} steps, "
                     f"guidance {sampling['guidance_scale']:g}, seed {sampling['seed']}, "
                     f"batch {sampling['batch_size']} ({sampling['seconds']} s)"
                     + (f"; grid: {sampling['grid']}" if "grid" in sampling else ""))
    rows: list[tuple[str, str]] = []
    metrics = results["metrics"]
    if "adherence" in metrics:
        adherence = metrics["adherence"]
        acceptance = adherence["acceptance"]
        verdict = "pass" if acceptance["passed"] else "FAIL"
        rows += [("shape accuracy", _percent(adherence["shape_accuracy"])),
                 ("colour accuracy", _percent(adherence["colour_accuracy"])),
                 (f"shape-and-colour adherence (acceptance >= {_percent(acceptance['joint_accuracy_at_least'])})",
                  f"{_percent(adherence['joint_accuracy'])} ({verdict})")]
        if "size_accuracy" in adherence:
            rows.append(("size accuracy", _percent(adherence["size_accuracy"])))
        rows += [("adherence per shape (%)", _per_group(adherence["joint_accuracy_per_shape"])),
                 ("adherence per colour (%)", _per_group(adherence["joint_accuracy_per_colour"]))]
        if adherence["most_frequent_mistakes"]:
            rows.append(("most frequent mistakes", "; ".join(f"{k} ({v})" for k, v in
                                                             adherence["most_frequent_mistakes"].items())))
    if "composition" in metrics:
        composition = metrics["composition"]
        single, scenes = composition.get("single"), composition.get("two_object")
        if single:
            for part, words in (("seen", "combinations the train split showed"), ("unseen", "HELD_OUT combinations")):
                if single[part]["num_samples"]:
                    rows.append((f"adherence (shape, colour and size), {words} (n={single[part]['num_samples']})",
                                 f"{_percent(single[part]['accuracy'])} (shape and colour "
                                 f"{_percent(single[part]['joint_accuracy'])})"))
        if scenes:
            rows += [(f"two objects: object-level adherence (n={2 * scenes['num_samples']} objects)",
                      _percent(scenes["object_level"])),
                     (f"two objects: image-level adherence (n={scenes['num_samples']})", _percent(scenes["image_level"])),
                     ("two objects: relation right / shape / colour / size",
                      " / ".join(_percent(scenes[k]) for k in ("relation_accuracy", "shape_accuracy", "colour_accuracy",
                                                              "size_accuracy"))),
                     ("two objects: image-level per relation (%)", _per_group(scenes["image_level_per_relation"])),
                     (f"two objects: object-level on HELD_OUT objects (n={scenes['num_unseen_objects']})",
                      _percent(scenes["object_level_unseen_objects"]))]
    if "fd" in metrics:
        fd = metrics["fd"]
        rows += [(f"FD, samples vs real renders (judge features, n={fd['num_samples']})", f"{fd['fd']:.3f}"),
                 ("FD, real vs real renders (floor at this n)", f"{fd['fd_real_vs_real']:.3f}")]
    if "judge" in results:
        accuracy = results["judge"]["held_out_accuracy"]
        rows.append(("judge held-out accuracy shape / colour / size",
                     " / ".join(_percent(accuracy[k]) for k in ("shape", "colour", "size"))
                     + (" (cached)" if results["judge"]["cached"] else " (trained now)")))
    if "half_judge" in results:
        accuracy = results["half_judge"]["held_out_accuracy"]
        rows.append(("two-object judge held-out accuracy shape / colour / size / all three",
                     " / ".join(_percent(accuracy[k]) for k in ("shape", "colour", "size", "object"))
                     + (" (cached)" if results["half_judge"]["cached"] else " (trained now)")))
    if "digits_accuracy" in metrics:
        digits = metrics["digits_accuracy"]
        rows += [("digit accuracy", _percent(digits["accuracy"])),
                 ("digit accuracy per class (%)", _per_group(digits["accuracy_per_class"])),
                 ("classifier held-out accuracy", _percent(digits["classifier"]["held_out_accuracy"]))]
        if "held_out_accuracy_through_image_size" in digits["classifier"]:
            rows.append(("classifier held-out accuracy, real images at the model's size",
                         _percent(digits["classifier"]["held_out_accuracy_through_image_size"])))
    if "codec" in metrics:
        held_out, natural = metrics["codec"]["held_out"], metrics["codec"]["natural"]
        rows += [(f"codec PSNR / SSIM, held-out {dataset.get('name')} (n={held_out['num_images']})",
                  f"{held_out['psnr']:.2f} dB / {held_out['ssim']:.4f}"),
                 (f"codec PSNR / SSIM, scikit-image photos at {natural['size']}px (n={natural['num_images']})",
                  f"{natural['psnr']:.2f} dB / {natural['ssim']:.4f}")]
    for metric, reason in results.get("skipped", {}).items():
        rows.append((f"{metric} (skipped)", reason))
    width = max(len("metric"), *(len(name) for name, _ in rows)) if rows else len("metric")
    table = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    table += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    return "\n".join(lines + [""] + table)
