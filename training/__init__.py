"""Datasets, the training/evaluation engine and the Python SDK."""
from .sdk import EmotionRecognizer
from .seed_sdk import Emotion_Recognize

__all__ = ["EmotionRecognizer", "Emotion_Recognize"]
