"""Evaluating checkpoints: prompt adherence and Fréchet distance on the shapes dataset (read by a
small CNN judge trained on the dataset's own renders), class accuracy on the digits dataset (read
by a scikit-learn SVM), and codec fidelity (PSNR, SSIM). `latentgen-eval` is the command line;
`evaluate_checkpoint` does the same from Python."""

from latentgen.evaluation.evaluate import EvalSettings, evaluate_checkpoint
from latentgen.evaluation.frechet import frechet_distance, frechet_distance_of_features
from latentgen.evaluation.image_quality import psnr, ssim

__all__ = ["EvalSettings", "evaluate_checkpoint", "frechet_distance", "frechet_distance_of_features", "psnr", "ssim"]
