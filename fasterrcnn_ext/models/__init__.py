"""Models: ``fasterrcnn_ext.models.detection`` mirrors torchvision.models.detection's Faster R-CNN."""
