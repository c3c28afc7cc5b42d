"""Real-time CIFAR-100 classification pipeline: simulator -> Kafka -> ResNet-50 -> PostgreSQL."""

__version__ = "0.1.0"
