"""What comes out: typed detections, the official parser, COCO, drawing."""
