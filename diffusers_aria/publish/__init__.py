"""Publishing a run: the model card (`model_card`) and the upload with its secret checks (`hub`)."""
