"""Class accuracy of generated digits, read by a scikit-learn SVM trained on the real 8x8 digits.

The digits dataset maps scikit-learn's 8x8 images (ink 0..16) forward by a bicubic upsampling to
the model's size and a linear map to [-1, 1], repeated on RGB. Samples are mapped back the inverse
way: mean over RGB, area-average down to 8x8, then to 0..16. The classifier (an RBF support-vector
machine, fit in well under a second) learns on the dataset's own train split, so the test split it
is checked on is the one no digits model saw either.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from latentgen.datasets.digits import DIGIT_WORDS, MAX_VALUE, DigitsDataset

DIGITS_SIZE = 8


def digit_space(images: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] -> scikit-learn digits features (N, 64) in 0..16."""
    if images.ndim != 4 or images.shape[-1] % DIGITS_SIZE or images.shape[-2] % DIGITS_SIZE:
        raise ValueError(f"digit_space needs images (N, C, H, W) with H and W multiples of {DIGITS_SIZE}; "
                         f"got {tuple(images.shape)}")
    gray = images.float().mean(dim=1, keepdim=True)  # (N, 1, H, W)
    small = F.adaptive_avg_pool2d(gray, DIGITS_SIZE)  # (N, 1, 8, 8), area average
    return ((small + 1) * (MAX_VALUE / 2)).clamp(0, MAX_VALUE).reshape(len(images), -1).cpu().numpy()


def _split(split: str, seed: int, image_size: int = DIGITS_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    data = DigitsDataset(image_size=image_size, split=split, seed=seed)
    items = [data[i] for i in range(len(data))]
    return torch.stack([item["image"] for item in items]), np.array([item["label"] for item in items])


def fit_digits_classifier(seed: int = 0, image_size: int | None = None) -> tuple[Any, dict[str, float]]:
    """An SVM fit on the train split of `DigitsDataset(seed=seed)`, and its accuracy on the test split:
    on the raw 8x8 images, and (with `image_size`) on test images upsampled as a model sees them and
    mapped back by `digit_space`, which is the path every sample takes."""
    from sklearn.svm import SVC

    train_images, train_labels = _split("train", seed)
    classifier = SVC().fit(digit_space(train_images), train_labels)
    test_images, test_labels = _split("test", seed)
    accuracy = {"held_out_accuracy": float((classifier.predict(digit_space(test_images)) == test_labels).mean())}
    if image_size is not None and image_size != DIGITS_SIZE:
        upsampled, labels = _split("test", seed, image_size)
        accuracy["held_out_accuracy_through_image_size"] = float(
            (classifier.predict(digit_space(upsampled)) == labels).mean())
    return classifier, accuracy


def score_digits(classifier: Any, images: torch.Tensor, labels: Sequence[int]) -> dict[str, Any]:
    """Overall and per-class accuracy of images (N, 3, H, W) in [-1, 1] against the requested digits (N,)."""
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"score_digits needs one label per image; got {len(images)} images and {len(labels)} labels")
    hits = classifier.predict(digit_space(images)) == labels
    return {"num_samples": len(labels), "accuracy": float(hits.mean()),
            "accuracy_per_class": {f"{digit} ({DIGIT_WORDS[digit]})": float(hits[labels == digit].mean())
                                   for digit in range(len(DIGIT_WORDS)) if (labels == digit).any()}}
