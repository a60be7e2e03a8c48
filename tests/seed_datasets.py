"""The seed SDK's example datasets, as its README describes them: a user's code, not ours.

``RAFTrainSet``: a RAF-DB list file (``name label`` per line, labels 1-7), images read with
OpenCV, converted BGR→RGB, resized to 100x100 and turned into ``[3, 100, 100]`` float tensors in
[0, 1] by ``transforms.ToTensor()`` (no normalization). ``AFEWTrainSet``: a list file
(``folder label``, labels 0-6) of frame folders; 16 frames sampled at random and kept in order,
each resized to 224x224, made grey in three channels and turned into a tensor, stacked to
``[16, 3, 224, 224]`` and then *reshaped* (the seed's way, not permuted) to ``[3, 16, 224, 224]``.

OpenCV is not a dependency of this project: when ``cv2`` is missing, a stand-in with the three
calls these datasets make is used, so that the class bodies stay as a user wrote them.
"""
import os
import random

import numpy as np
import torch
import torch.utils.data as data
from PIL import Image
from torchvision import transforms

try:
    import cv2
except ImportError:  # pragma: no cover - depends on the environment
    class cv2:  # noqa: N801 - mimics the module
        """imread / cvtColor / resize with OpenCV's conventions (BGR uint8 arrays)."""

        COLOR_BGR2RGB = 4

        @staticmethod
        def imread(path):
            return np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1].copy()

        @staticmethod
        def cvtColor(image, code):
            assert code == cv2.COLOR_BGR2RGB
            return image[:, :, ::-1].copy()

        @staticmethod
        def resize(image, size):
            return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


class RAFTrainSet(data.Dataset):
    def __init__(self, train_list, data_dir):
        self.images = list()
        self.targets = list()
        with open(train_list) as f:
            for line in f.readlines():
                name, label = line.strip().split(' ')
                self.images.append(os.path.join(data_dir, name))
                self.targets.append(int(label) - 1)
        self.transform = transforms.Compose([
            transforms.ToPILImage(),
            transforms.ToTensor(),
        ])

    def __getitem__(self, index):
        image = cv2.imread(self.images[index])
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        image = cv2.resize(image, (100, 100))
        image = self.transform(image)
        return image, self.targets[index]

    def __len__(self):
        return len(self.targets)


class RAFRecogSet(RAFTrainSet):
    """The same images, yielding ``(image, filename)`` for ``batch_recognize``."""

    def __getitem__(self, index):
        image, _ = super().__getitem__(index)
        return image, self.images[index]


class AFEWTrainSet(data.Dataset):
    def __init__(self, train_list, train_data_dir):
        self.images = list()
        self.targets = list()
        with open(train_list) as f:
            for line in f.readlines():
                folder, label = line.strip().split(' ')
                self.images.append(os.path.join(train_data_dir, folder))
                self.targets.append(int(label))
        self.transform = transforms.Compose([
            transforms.Resize((224, 224)),
            transforms.Grayscale(num_output_channels=3),
            transforms.ToTensor(),
        ])

    def __getitem__(self, index):
        frames = sorted(os.listdir(self.images[index]))
        picked = sorted(random.sample(range(len(frames)), 16))
        video = []
        for i in picked:
            image = Image.open(os.path.join(self.images[index], frames[i]))
            video.append(self.transform(image))
        video = torch.stack(video)
        D, C, H, W = video.size()
        video = video.reshape(C, D, H, W)
        return video, self.targets[index]

    def __len__(self):
        return len(self.targets)


class AFEWRecogSet(AFEWTrainSet):
    """The same clips, yielding ``(clip, folder)`` for ``batch_recognize``."""

    def __getitem__(self, index):
        video, _ = super().__getitem__(index)
        return video, self.images[index]
