// The chart pieces the results app uses, and nothing else (a custom ECharts build).
import * as echarts from 'echarts/core';
import { LineChart, ScatterChart, ParallelChart } from 'echarts/charts';
import {
  GridComponent, TooltipComponent, LegendComponent, ParallelComponent,
  DataZoomComponent, TitleComponent, MarkLineComponent
} from 'echarts/components';
import { CanvasRenderer } from 'echarts/renderers';
echarts.use([LineChart, ScatterChart, ParallelChart, GridComponent, TooltipComponent, LegendComponent,
  ParallelComponent, DataZoomComponent, TitleComponent, MarkLineComponent, CanvasRenderer]);
window.echarts = echarts;
