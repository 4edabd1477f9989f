/* Offline stand-in for bootstrap-table in GX's Data Docs (stages/validate/docs_offline.py).
 * GX's index page builds its run table with $(table).bootstrapTable({columns, data, ...});
 * bootstrap-table has no PyPI package, so this draws the same table: the columns' titles,
 * the rows' HTML cells, the sort order (sortName/sortOrder; click a sortable header to
 * re-sort), rowAttributes/rowStyle, and the 'click-row.bs.table' event GX listens to.
 * Search, filter controls and pagination are not drawn; their method calls do nothing. */
(function ($) {
  "use strict";
  function named(fn) {
    return typeof fn === "function" ? fn : window[fn];
  }
  function sortKey(columns, name) {
    var column = columns.find(function (c) { return c.field === name; });
    return column && column.sortName ? column.sortName : name;
  }
  function draw($table, options) {
    var columns = options.columns || [];
    var rows = (options.data || []).slice();
    var key = sortKey(columns, options.sortName);
    var sign = options.sortOrder === "desc" ? -1 : 1;
    if (options.sortName) {
      rows.sort(function (a, b) {
        return a[key] < b[key] ? -sign : a[key] > b[key] ? sign : 0;
      });
    }
    var $head = $("<tr>");
    columns.forEach(function (column) {
      var $th = $("<th>").text(column.title || column.field);
      if (column.align) { $th.css("text-align", column.align); }
      if (column.sortable) {
        $th.css("cursor", "pointer").on("click", function () {
          var desc = options.sortName === column.field && options.sortOrder !== "desc";
          draw($table, $.extend({}, options, {
            sortName: column.field, sortOrder: desc ? "desc" : "asc"
          }));
        });
      }
      $head.append($th);
    });
    var $body = $("<tbody>");
    rows.forEach(function (row, index) {
      var $tr = $("<tr>");
      var attributes = options.rowAttributes ? named(options.rowAttributes)(row, index) : {};
      $.each(attributes || {}, function (name, value) { $tr.attr(name, value); });
      var style = options.rowStyle ? named(options.rowStyle)(row, index) : {};
      if (style && style.css) { $tr.css(style.css); }
      columns.forEach(function (column) {
        var $td = $("<td>").html(row[column.field] == null ? "" : String(row[column.field]));
        if (column.align) { $td.css("text-align", column.align); }
        $tr.append($td);
      });
      $tr.on("click", function () { $table.trigger("click-row.bs.table", [row, $tr]); });
      $body.append($tr);
    });
    $table.addClass("table table-hover").empty().append($("<thead>").append($head), $body);
  }
  $.fn.bootstrapTable = function (options) {
    if (typeof options === "string") { return this; }  // clearFilterControl, resetSearch, ...
    return this.each(function () { draw($(this), options || {}); });
  };
})(jQuery);
