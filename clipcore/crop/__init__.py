"""Face crops before CLIP (the crop stage, between prepare and train).

faces: the MTCNN detector (facenet-pytorch, an optional install: requirements-face.txt), the
largest face of each image and its crop, widened by a margin and levelled on the eyes.
cropping: the stage's work: every manifest image cropped once into data/cropped/ under the same
relative path (so train, embed and the report read it in place of data.root), an image with no face
copied whole and listed in crop_report.csv. May import data.
The stages that read pixels take their image root from clipcore.paths.image_root.
"""
