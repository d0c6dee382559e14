"""Image transforms: light augmentation for training, a plain resize for everything else (the same
resize the service applies, so evaluation sees what production sees)."""

from __future__ import annotations

from torchvision import transforms as T


def train_transform(size: int) -> T.Compose:
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(0.9, 1.1)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.1, 0.1, 0.1),
            T.ToTensor(),
        ]
    )


def eval_transform(size: int) -> T.Compose:
    return T.Compose([T.Resize((size, size)), T.ToTensor()])
