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


@hydra.main(config_path="pkg://latentgen.conf", config_name="eval", version_base="1.3")
def _evaluate(cfg: DictConfig) -> None:
    from latentgen.config.containers import to_plain
    from latentgen.config.settings import EvalAppSettings, app_settings

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with reported():
        app_settings(EvalAppSettings, to_plain(cfg))  # every setting checked before torch is even imported
        from latentgen.assembly import build_component
        from latentgen.evaluation.evaluate import EvalSettings, evaluate_checkpoint
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
        settings = EvalSettings(
            metrics=metrics, num_samples=cfg.num_samples, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
            scheduler=build_component("scheduler", cfg.scheduler) if cfg.get("scheduler") else None,
            seed=int(cfg.seed), batch_size=cfg.batch_size, device=cfg.device, dataset=to_plain(cfg.get("dataset")),
            cache_dir=cfg.cache_dir, judge=recipe, min_judge_accuracy=min_accuracy,
            codec_images=cfg.codec_fidelity.images, natural_size=cfg.codec_fidelity.natural_size,
            progress=bool(cfg.progress), grid_path=run_dir / "samples.png")
        results = evaluate_checkpoint(cfg.checkpoint, settings)
    text = json.dumps(results, indent=2)
    paths = [run_dir / "eval.json"] + ([Path(cfg.out)] if cfg.out else [])
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(markdown_table(results))
    log.info("wrote %s", ", ".join(str(path) for path in paths))


def main() -> None:
    register_component_options()
    _evaluate()


if __name__ == "__main__":
    main()
