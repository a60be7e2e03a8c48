"""Datasets, the training/evaluation engine and the Python SDK."""
from .sdk import Emotion_Recognize, EmotionRecognizer

__all__ = ["EmotionRecognizer", "Emotion_Recognize"]
