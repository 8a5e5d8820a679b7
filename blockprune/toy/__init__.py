"""Toy text-to-image models trained by the project: a procedural shapes dataset, a checker, models and a quality suite.

- :mod:`.captions` / :mod:`.dataset`: 32 × 32 images of one to three shapes with captions, on the fly;
- :mod:`.checker`: reads images back into shapes (kind, colour, position) and judges them against captions;
- :mod:`.models` / :mod:`.pipeline`: FLUX- and SD3-architecture diffusers transformers on pixels with a
  word-level text encoder, and ``ToyPipeline`` (Euler sampler for rectified flow);
- :mod:`.training`: rectified-flow training within a time budget;
- :mod:`.evaluation` / :mod:`.metrics`: teacher fidelity, attribute accuracy, Fréchet distance, also as
  importance metrics (``toy_fidelity``, ``toy_accuracy``, ``toy_frechet``);
- :mod:`.grid`: labelled side-by-side image grids as PNG.
"""

from .captions import Caption, all_captions, parse_caption, split_ids, vocabulary
from .checker import Shape, detect, image_features, judge
from .dataset import ShapeBatch, ShapesDataset, sample_batch
from .evaluation import (
    CheckerFeatures,
    attribute_accuracy,
    checker_frechet_distance,
    dataset_images,
    evaluate,
    evaluation_prompts,
    generate,
    psnr,
    ssim,
    teacher_fidelity,
)
from .grid import image_grid, save_image_grid
from .models import ToyConfig, ToyTextEncoder
from .pipeline import WEIGHTS_DIR, ToyPipeline, ToyPipelineOutput, calibration_batches

__all__ = [
    "WEIGHTS_DIR",
    "Caption",
    "CheckerFeatures",
    "Shape",
    "ShapeBatch",
    "ShapesDataset",
    "ToyConfig",
    "ToyPipeline",
    "ToyPipelineOutput",
    "ToyTextEncoder",
    "all_captions",
    "attribute_accuracy",
    "calibration_batches",
    "checker_frechet_distance",
    "dataset_images",
    "detect",
    "evaluate",
    "evaluation_prompts",
    "generate",
    "image_grid",
    "image_features",
    "judge",
    "parse_caption",
    "psnr",
    "sample_batch",
    "save_image_grid",
    "split_ids",
    "ssim",
    "teacher_fidelity",
    "vocabulary",
]
