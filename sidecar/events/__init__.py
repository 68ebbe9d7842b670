"""The event relay: publishing to RabbitMQ through a durable spool, and subscriptions."""
