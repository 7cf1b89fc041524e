"""Sign-in with OAuth2 / OpenID Connect providers: configuration, provider clients, pending-flow state.

`config` reads the providers from the environment, `providers` talks to them (`OIDCProvider`,
`GitHubProvider`, each an `IdentityProvider` of domain/ports.py), `state` keeps each pending sign-in
in Redis for its callback.
"""
