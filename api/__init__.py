"""The HTTP layer of maml-service: thin routes over ``service/``; ``api.main.create_app`` builds the app."""
