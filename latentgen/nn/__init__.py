"""Neural building blocks shared by components: attention, normalization, the LDM autoencoder, embeddings."""
