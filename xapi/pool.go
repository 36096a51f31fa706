package xapi

import (
	"context"
	"errors"
)

// PoolGetAll returns pool.get_all (always one pool).
func (c *Client) PoolGetAll(ctx context.Context) ([]PoolRef, error) {
	return call[[]PoolRef](ctx, c, "pool.get_all")
}

// PoolGetAllRecords returns pool.get_all_records.
func (c *Client) PoolGetAllRecords(ctx context.Context) (map[PoolRef]PoolRecord, error) {
	return call[map[PoolRef]PoolRecord](ctx, c, "pool.get_all_records")
}

// PoolGetRecord returns pool.get_record.
func (c *Client) PoolGetRecord(ctx context.Context, pool PoolRef) (PoolRecord, error) {
	return call[PoolRecord](ctx, c, "pool.get_record", pool)
}

// ThePool returns the ref of the (only) pool.
func (c *Client) ThePool(ctx context.Context) (PoolRef, error) {
	pools, err := c.PoolGetAll(ctx)
	if err != nil {
		return "", err
	}
	if len(pools) == 0 {
		return "", errors.New("xapi: pool.get_all returned no pool")
	}
	return pools[0], nil
}

// PoolGetMaster returns pool.get_master.
func (c *Client) PoolGetMaster(ctx context.Context, pool PoolRef) (HostRef, error) {
	return call[HostRef](ctx, c, "pool.get_master", pool)
}

// PoolGetOtherConfig returns pool.get_other_config.
func (c *Client) PoolGetOtherConfig(ctx context.Context, pool PoolRef) (map[string]string, error) {
	return call[map[string]string](ctx, c, "pool.get_other_config", pool)
}

// PoolAddToOtherConfig calls pool.add_to_other_config (MAP_DUPLICATE_KEY if
// the key exists).
func (c *Client) PoolAddToOtherConfig(ctx context.Context, pool PoolRef, key, value string) error {
	return callVoid(ctx, c, "pool.add_to_other_config", pool, key, value)
}

// PoolRemoveFromOtherConfig calls pool.remove_from_other_config (no error
// when the key is absent).
func (c *Client) PoolRemoveFromOtherConfig(ctx context.Context, pool PoolRef, key string) error {
	return callVoid(ctx, c, "pool.remove_from_other_config", pool, key)
}

// SetPoolOtherConfigKey sets one key: remove, then add. It is not atomic; a
// concurrent writer of the same key can make the add fail with
// MAP_DUPLICATE_KEY.
func (c *Client) SetPoolOtherConfigKey(ctx context.Context, pool PoolRef, key, value string) error {
	if err := c.PoolRemoveFromOtherConfig(ctx, pool, key); err != nil {
		return err
	}
	return c.PoolAddToOtherConfig(ctx, pool, key, value)
}
