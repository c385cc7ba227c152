"""token-broker: serves users' OIDC access tokens over gRPC, refreshing them safely at the identity provider."""

__version__ = "0.1.0"
