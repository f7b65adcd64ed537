"""latentgen-eval: metrics of a checkpoint (`latentgen-eval checkpoint=... [metrics=[adherence,fd,codec]]`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from latentgen.cli.errors import reported
from latentgen.config import register_component_options

log = logging.getLogger("latentgen.eval")


RESULTS = ("eval.json",)  # what a finished run leaves; an earlier run's is kept unless overwrite=true


def accept(config: dict, run_dir: Path) -> list:
    """Every setting checked, the adapters built (their files read and checked) and the run directory claimed,
    before any weight is read or Hydra writes; the adapters."""
    from latentgen.cli.adapter_options import build_adapters, listed_adapters
    from latentgen.config.settings import EvalAppSettings, app_settings
    from latentgen.run_dir import claim, refuse_finished

    settings = app_settings(EvalAppSettings, config)
    adapters = build_adapters(listed_adapters(settings.adapters))
    claim(run_dir)
    refuse_finished(run_dir, RESULTS, settings.overwrite, "latentgen-eval run")
    return adapters


@hydra.main(config_path="pkg://latentgen.conf", config_name="eval", version_base="1.3")
def _evaluate(cfg: DictConfig) -> None:
    from latentgen.config.containers import to_plain

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with reported():
        adapters = accept(to_plain(cfg), run_dir)  # again: a sweep's job is checked only here
        from latentgen.assembly import build_component
        from latentgen.threads import configure_threads

        configure_threads(cfg.get("threads"))
        from latentgen.evaluation.evaluate import CompositionCounts, EvalSettings, evaluate_checkpoint
        from latentgen.evaluation.report import markdown_table
        from latentgen.evaluation.shapes_judge import JudgeRecipe

        judge = dict(to_plain(cfg.judge))
        min_accuracy = float(judge.pop("min_accuracy"))
        try:
            recipe = JudgeRecipe(**judge)
        except TypeError as exc:
            raise ValueError(f"judge: {exc}; the judge settings are min_accuracy and "
                             f"{', '.join(JudgeRecipe.__dataclass_fields__)}") from exc
        metrics = to_plain(cfg.metrics)
        composition = dict(to_plain(cfg.composition))
        min_half_accuracy = float(composition.pop("min_judge_accuracy"))
        settings = EvalSettings(
            metrics=metrics, num_samples=cfg.num_samples, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
            scheduler=build_component("scheduler", cfg.scheduler) if cfg.get("scheduler") else None,
            seed=int(cfg.seed), batch_size=cfg.batch_size, device=cfg.device, dataset=to_plain(cfg.get("dataset")),
            cache_dir=cfg.cache_dir, judge=recipe, min_judge_accuracy=min_accuracy,
            composition=CompositionCounts(**composition), min_half_judge_accuracy=min_half_accuracy,
            codec_images=cfg.codec_fidelity.images, natural_size=cfg.codec_fidelity.natural_size,
            progress=bool(cfg.progress), grid_path=run_dir / "samples.png", adapters=adapters)
        results = evaluate_checkpoint(cfg.checkpoint, settings)
        text = json.dumps(results, indent=2)
        paths = [run_dir / "eval.json"] + ([Path(cfg.out)] if cfg.out else [])
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    print(markdown_table(results))
    log.info("wrote %s", ", ".join(str(path) for path in paths))


def main() -> None:
    import sys

    from latentgen.cli.preflight import preflight
    from latentgen.run_dir import release_all

    register_component_options()
    try:
        with reported():
            sys.argv = [sys.argv[0], *preflight("eval", sys.argv[1:], accept)]
        _evaluate()
    finally:
        release_all()


if __name__ == "__main__":
    main()
