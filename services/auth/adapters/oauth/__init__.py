"""Sign-in with OAuth2 / OpenID Connect providers: configuration, provider clients, pending-flow state.

`config` reads the providers from the environment, `providers` talks to them (`IdentityProvider`,
`OIDCProvider`, `GitHubProvider`), `state` keeps each pending sign-in in Redis for its callback.
"""
