"""lbha-example-redis: an example third-party lbha plugin adding a Redis negotiate check."""

from lbha_example_redis.check import RedisCheck

__all__ = ["RedisCheck"]
__version__ = "0.1.0"
